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
//! - `policies/<tenant>`: a tenant's own policy ([`tenant::TenantPolicy`]),
//!   its files under `tenants/<tenant>/blobs/`, and what each node says of
//!   it under `tenants/<tenant>/nodes/<node>`: keys a tenant's etcd role may
//!   be granted without reaching anyone else's.
//!
//! A node reads the config and the pools at one revision (the pools in pages),
//! builds the files it names into a private state directory, and applies
//! the whole through the gateway's one rebuild-and-swap; a revision that
//! does not build is reported and the last good one keeps serving. The last
//! good revision is kept on disk too, so a node restarted while etcd is away
//! serves it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, PoolConfig, check_pool_name};

mod acme;
mod apply;
pub mod node;
pub mod publish;
mod read;
mod report;
mod settings;
mod store;
pub mod tenant;

pub use settings::{EtcdTls, FleetSettings, NodeFile, connect, host_name, valid_node_name};

pub use node::{Node, Report};
pub use read::{Revisions, current_revisions};

/// Bytes per blob chunk: one etcd value each, under its 1.5 MiB request limit.
pub const CHUNK: usize = 1 << 20;

/// Largest file a publish may carry (the Python example plugin is 18 MB).
pub const MAX_BLOB_BYTES: u64 = 256 << 20;

/// Largest file of a tenant's policy: every node holds each one whole while
/// it checks it, and a tenant may not spend the nodes' memory.
pub const MAX_TENANT_BLOB_BYTES: u64 = 32 << 20;

/// Largest published config text (etcd refuses requests over 1.5 MiB).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Largest value of one pool under `pools/` (a pool of a thousand servers
/// is a tenth of it): the admin API writes no larger one, and a node
/// refuses a larger one written by hand.
pub const MAX_POOL_BYTES: usize = 256 << 10;

/// Largest answer to a node's read of the config and pools.
pub(crate) const MAX_STATE_BYTES: usize = 64 << 20;

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
    /// A value of the fleet's state is not what weir writes there.
    #[error("etcd key {key}: {reason}")]
    BadState {
        /// The state's revision ([`State::content_revision`]: the latest
        /// write to the config or the pools).
        revision: i64,
        /// The etcd revision it was read at.
        read_at: i64,
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
        FleetError::Etcd(etcd_reason(&error))
    }
}

/// What a refused TLS handshake with etcd comes with.
const TLS_HINT: &str = "check fleet.tls: `ca` must sign etcd's certificate, `server_name` must be a name in it, and etcd may require `cert` and `key`";

/// What a request etcd did not answer comes with.
const UNREACHABLE_HINT: &str = "check that etcd runs at fleet.endpoints (or --etcd) and that this host may reach it";

/// What a connection etcd closed comes with: over TLS, etcd closes one
/// whose client certificate it refuses, after the handshake.
const CLOSED_HINT: &str = "etcd closed the connection: check fleet.tls `cert` and `key` if etcd requires client certificates, else that etcd runs at fleet.endpoints (or --etcd)";

impl FleetError {
    /// Whether etcd did not answer (down, unreachable, electing a leader,
    /// the connection closed): worth another try, where a refusal is not.
    pub fn is_transient(&self) -> bool {
        matches!(self, FleetError::Etcd(reason) if reason.contains(UNREACHABLE_HINT) || reason.contains(CLOSED_HINT))
    }

    /// Whether etcd (or this node) refused the TLS handshake: settings to
    /// fix, not an outage to wait out.
    pub fn is_tls_refused(&self) -> bool {
        matches!(self, FleetError::Etcd(reason) if reason.contains(TLS_HINT))
    }
}

/// What went wrong with a request to etcd, in one line: what etcd (or the
/// transport) said, the cause under it, and what to check when it is the
/// way to etcd that failed rather than the request.
fn etcd_reason(error: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (said, transport, mut source) = match error {
        etcd_client::Error::GRpcStatus(status) => (
            status.message().to_owned(),
            // gRPC's CANCELLED (1: the connection closed), UNKNOWN (2),
            // DEADLINE_EXCEEDED (4), UNAVAILABLE (14): no answer from etcd
            // itself.
            matches!(i32::from(status.code()), 1 | 2 | 4 | 14),
            status.source(),
        ),
        etcd_client::Error::TransportError(e) => ("transport error".to_owned(), true, e.source()),
        other => return other.to_string(),
    };
    // The innermost cause: an OS error, a TLS alert, a certificate refused.
    let mut cause = None;
    while let Some(inner) = source {
        cause = Some(inner.to_string());
        source = inner.source();
    }
    let mut reason = match cause {
        Some(cause) if !said.contains(&cause) => format!("{said}: {cause}"),
        _ => said,
    };
    if transport {
        let lower = reason.to_ascii_lowercase();
        let hint = if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            TLS_HINT
        } else if lower.contains("connection closed") {
            CLOSED_HINT
        } else {
            UNREACHABLE_HINT
        };
        reason = format!("{reason} ({hint})");
    }
    reason
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

    /// Where the operator's files are kept.
    pub fn blobs(&self) -> Blobs {
        Blobs {
            root: format!("{}blobs/", self.prefix),
            limit: MAX_BLOB_BYTES,
        }
    }

    /// Where a tenant's files are kept.
    pub fn tenant_blobs(&self, tenant: &str) -> Blobs {
        Blobs {
            root: format!("{}tenants/{tenant}/blobs/", self.prefix),
            limit: MAX_TENANT_BLOB_BYTES,
        }
    }

    /// What the nodes say of a tenant's policy.
    pub fn tenant_nodes(&self, tenant: &str) -> String {
        format!("{}tenants/{tenant}/nodes/", self.prefix)
    }

    /// What one node says of a tenant's policy.
    pub fn tenant_node(&self, tenant: &str, node: &str) -> String {
        format!("{}tenants/{tenant}/nodes/{node}", self.prefix)
    }

    /// All tenants' policies.
    pub fn policies(&self) -> String {
        format!("{}policies/", self.prefix)
    }

    /// One tenant's policy.
    pub fn policy(&self, tenant: &str) -> String {
        format!("{}policies/{tenant}", self.prefix)
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

/// A place blobs are kept (`<root><sha256>/meta` and `<root><sha256>/<n>`),
/// and the largest one it may hold.
#[derive(Debug, Clone)]
pub struct Blobs {
    root: String,
    limit: u64,
}

impl Blobs {
    /// A blob's size and chunk count.
    pub fn meta(&self, sha256: &str) -> String {
        format!("{}{sha256}/meta", self.root)
    }

    /// One chunk of a blob.
    pub fn chunk(&self, sha256: &str, n: usize) -> String {
        format!("{}{sha256}/{n:05}", self.root)
    }

    /// The largest blob kept here.
    pub fn limit(&self) -> u64 {
        self.limit
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
    /// Tenants' own policies, by tenant (or why a value is not one).
    #[serde(default)]
    pub tenants: BTreeMap<String, Result<Published, String>>,
    /// The revision that last changed each of those policies.
    #[serde(default)]
    pub tenant_revisions: BTreeMap<String, i64>,
}

impl State {
    /// The state's revision, as `weir publish`, the node reports and `weir
    /// fleet status` all give it: that of the latest write to the config or
    /// the pools (each tenant's policy has its own, in the tenant's report).
    pub fn content_revision(&self) -> i64 {
        self.pool_revisions
            .values()
            .copied()
            .fold(self.config_revision, i64::max)
    }

    /// Whether `other` holds the same config and pools (whatever revision it
    /// was read at).
    pub fn same_content(&self, other: &State) -> bool {
        self.config_revision == other.config_revision
            && self.pool_revisions == other.pool_revisions
            && self.tenant_revisions == other.tenant_revisions
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
/// A value that is not what weir writes there is a [`FleetError::BadState`]
/// naming the revision it was read at.
pub async fn fetch_state(client: &mut etcd_client::Client, keys: &Keys) -> Result<State, FleetError> {
    use etcd_client::{GetOptions, Txn, TxnOp, TxnOpResponse};
    let txn = Txn::new().and_then(vec![
        TxnOp::get(keys.config(), None),
        // Keys only: the pools are read in pages and each policy on its own
        // below, at this revision, so that no number of pools and no
        // tenant's value can make one answer too large to read.
        TxnOp::get(keys.pools(), Some(GetOptions::new().with_prefix().with_keys_only())),
        TxnOp::get(keys.policies(), Some(GetOptions::new().with_prefix().with_keys_only())),
    ]);
    let response = client
        .kv_client()
        .max_decoding_message_size(MAX_STATE_BYTES)
        .txn(txn)
        .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
        TxnOpResponse::Get(get) => Some(get),
        _ => None,
    });
    let (Some(config), Some(pools), Some(policies)) = (gets.next(), gets.next(), gets.next()) else {
        return Err(FleetError::Etcd("a transaction answered without its reads".into()));
    };
    let content = config
        .kvs()
        .iter()
        .chain(pools.kvs())
        .map(etcd_client::KeyValue::mod_revision)
        .fold(0, i64::max);
    read_state(client, keys, revision, [config, pools, policies])
        .await
        .map_err(|error| match error {
            FleetError::BadValue { key, reason } => FleetError::BadState {
                revision: content,
                read_at: revision,
                key,
                reason,
            },
            other => other,
        })
}

/// The state in the answers to [`fetch_state`]'s reads (the config, the
/// pools, the keys of the tenants' policies) at `revision`.
async fn read_state(
    client: &mut etcd_client::Client,
    keys: &Keys,
    revision: i64,
    [config, pools, policies]: [etcd_client::GetResponse; 3],
) -> Result<State, FleetError> {
    use etcd_client::GetOptions;
    let config_key = keys.config();
    let Some(kv) = config.kvs().first() else {
        return Err(FleetError::BadValue {
            key: config_key,
            reason: "nothing has been published under this prefix (run `weir publish`)".into(),
        });
    };
    let published = decode_published(&config_key, kv.value())?;
    let mut state = State {
        revision,
        config_revision: kv.mod_revision(),
        published,
        pools: BTreeMap::new(),
        pool_revisions: BTreeMap::new(),
        tenants: BTreeMap::new(),
        tenant_revisions: BTreeMap::new(),
    };
    let pools_prefix = keys.pools();
    let pools = read::read_pages(client, &pools_prefix, revision, pools.kvs().len()).await?;
    for kv in &pools {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let name = key.strip_prefix(&pools_prefix).unwrap_or(&key).to_owned();
        check_pool_name(&name).map_err(|reason| FleetError::BadValue {
            key: key.clone(),
            reason,
        })?;
        if kv.value().len() > MAX_POOL_BYTES {
            return Err(FleetError::BadValue {
                key,
                reason: format!(
                    "{} bytes, more than a pool may have ({MAX_POOL_BYTES})",
                    kv.value().len()
                ),
            });
        }
        let pool: Option<PoolConfig> = decode(&key, kv.value())?;
        state.pool_revisions.insert(name.clone(), kv.mod_revision());
        state.pools.insert(name, pool);
    }
    let policies_prefix = keys.policies();
    for kv in policies.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let tenant = key.strip_prefix(&policies_prefix).unwrap_or(&key).to_owned();
        if let Err(reason) = check_pool_name(&tenant) {
            tracing::warn!(
                key = key.escape_debug().to_string(),
                reason,
                "not a tenant's policy; ignored"
            );
            continue;
        }
        // The policy as it was at the state's revision. A bad one is its
        // tenant's failure alone: kept here, refused when the node lays it
        // over the config.
        let options = GetOptions::new().with_revision(revision);
        let value = client.get(key.clone(), Some(options)).await?;
        let published = match value.kvs().first() {
            Some(value) => decode_published(&key, value.value()).map_err(|e| e.to_string()),
            None => continue,
        };
        state.tenant_revisions.insert(tenant.clone(), kv.mod_revision());
        state.tenants.insert(tenant, published);
    }
    Ok(state)
}

/// A [`Published`] value, bounded and of a format this weir reads.
fn decode_published(key: &str, value: &[u8]) -> Result<Published, FleetError> {
    let bad = |reason: String| FleetError::BadValue {
        key: key.to_owned(),
        reason,
    };
    if value.len() > MAX_CONFIG_BYTES * 2 {
        return Err(bad(format!("{} bytes, more than a config may have", value.len())));
    }
    let published: Published = decode(key, value)?;
    if published.format != FORMAT {
        return Err(bad(format!(
            "format {} (this weir reads format {FORMAT})",
            published.format
        )));
    }
    Ok(published)
}

/// Reads a blob and checks that its bytes hash to its name.
pub async fn fetch_blob(client: &mut etcd_client::Client, blobs: &Blobs, sha256: &str) -> Result<Vec<u8>, FleetError> {
    let meta_key = blobs.meta(sha256);
    let meta = client.get(meta_key.clone(), None).await?;
    let Some(kv) = meta.kvs().first() else {
        return Err(FleetError::BadValue {
            key: meta_key,
            reason: "missing: the config names a file that was not uploaded".into(),
        });
    };
    let meta: BlobMeta = decode(&meta_key, kv.value())?;
    if meta.size > blobs.limit() || meta.chunks != usize::try_from(meta.size.div_ceil(CHUNK as u64)).unwrap_or(0) {
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
        let key = blobs.chunk(sha256, n);
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
            key: blobs.meta(sha256),
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
